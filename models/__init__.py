"""Pure torch modules (installed as ``embedstore.models``): frozen encoders, the diffusion priors,
classifier heads, closed-form baselines and losses. Nothing here imports the rest of embedstore."""

__all__ = ["baselines", "domain", "encoders", "errors", "heads", "losses", "paper_prior", "prior"]
