"""liftplace: LIFT and PLACE distillation for tiny diffusion models."""
__version__ = "0.1.0"
