"""The microscope: the built-in simulated scope and (later) real Micro-Manager hardware."""
