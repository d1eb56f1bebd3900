"""Op rules by family (shapes, pointwise, layers, recurrent, attention), gathered in registry.py: the one
place a new rule is registered."""
