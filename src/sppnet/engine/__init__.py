"""Training and evaluation: ``classify`` and ``detect`` (packages, one module per stage),
``config`` (the composed-dataclass base both share), ``views``, ``demo``, ``distributed``, ``common``."""
