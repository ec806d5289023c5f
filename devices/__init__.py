"""The microscope: the built-in simulated scope, a replay scope for recorded stacks, and
real Micro-Manager hardware."""
