"""livestain: live virtual staining at the microscope.

Predicts fluorescent structures (nucleus, membrane, mitochondria) from unlabelled
brightfield z-stacks inside the acquisition loop, so a time-lapse needs no fluorescence.
"""

__version__ = "0.1.0"
