"""Cross-domain sentiment benchmark on the Amazon multi-domain reviews (Blitzer et al. 2007)."""
