"""longtrain.launch: the `longtrain` command, the torchrun entry point and the Ray launcher."""
