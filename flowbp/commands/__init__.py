"""Sub-commands of the ``flowbp`` CLI; each module exposes ``register(subparsers)``."""
