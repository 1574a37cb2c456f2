"""kdray: knowledge distillation from internal representations, swept and ablated at scale."""

__version__ = "0.1.0"
