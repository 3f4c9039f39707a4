"""Entry point for torchrun: one process per rank, rendezvous from torchrun's environment.

    torchrun --nproc_per_node 8 -m longtrain.launch.torchrun RECIPE [--resume auto|--overwrite] [section.key=value ...]
Two nodes (run on each, with its own --node_rank):
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \
        -m longtrain.launch.torchrun RECIPE
The arguments are `longtrain train`'s, overrides anywhere among the options. `longtrain train` does the
same when it finds torchrun's RANK / WORLD_SIZE in the environment. torchrun's own store listens on
every interface whatever its flags; README.md ("Network listeners") gives the loopback-only launch.
"""
import sys

from longtrain.launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
