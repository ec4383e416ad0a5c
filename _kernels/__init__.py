"""GPU kernels (Triton) and the plain-torch references that are their CPU path and test oracle."""
