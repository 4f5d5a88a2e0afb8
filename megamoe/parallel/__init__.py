"""Process groups and collectives. Empty on purpose: importing parallel.groups must not load megatron."""
