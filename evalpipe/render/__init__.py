"""What a run shows people: report.md, the comparison section and tables, the leaderboard, JUnit XML."""
