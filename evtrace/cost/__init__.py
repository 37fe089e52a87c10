"""Cost: the ATen-level FLOP counter (``count``), fvcore handles, the sympy cost model (``model``)."""
