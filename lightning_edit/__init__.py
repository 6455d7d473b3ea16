"""lightning-edit: neuron-level knowledge editing of LLMs through sparse components."""

__version__ = "0.1.0"
