"""A safetensors file with every tensor stored in fp16, header kept, as every bundled file is; for the files
`ldmkit convert --dtype fp16` does not take (a tiny autoencoder):

    python recipes/fp16.py IN.safetensors OUT.safetensors"""

import sys

from safetensors import safe_open
from safetensors.torch import save_file

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python recipes/fp16.py IN.safetensors OUT.safetensors")
    with safe_open(sys.argv[1], "pt") as f:
        save_file({k: f.get_tensor(k).half() for k in f.keys()}, sys.argv[2], f.metadata())
