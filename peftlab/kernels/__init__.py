"""Fast paths, each with a plain-PyTorch definition the tests compare it to."""
