"""The acquisition daemon: runs useq plans, assembles and writes stacks, streams them."""
