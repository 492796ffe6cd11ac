"""GPU kernels for the W4AFP8 / FP8 paths: SM90 CUTLASS (csrc/w4afp8) and Triton, checked against
runtime.quant.numerics. Importing this package needs neither a GPU nor Triton; the modules do."""
