"""Float64 references of emafuse's update rules, one module per rule, each written from the
numbered update of shared/spec/optimizers.md (not from emafuse's code). Every reference implements
the interface of :class:`references.base.Reference`."""
