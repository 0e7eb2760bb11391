"""atomkit."""
