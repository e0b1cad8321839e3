"""Built-in routing policies, one module each."""
