"""Training libraries: optimizers, callbacks, distribution strategies, weight loading shared by the stages."""
