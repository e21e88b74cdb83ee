# Installed as the package gpubp.cuda_kernels so that the CUDA sources ship in the wheel
# (see pyproject.toml); gpubp/kernels.py finds them here or in the checkout.
