"""dpo-dist: SFT, DPO and continued pretraining, from one GPU to many nodes."""
__version__ = "0.1.0"
