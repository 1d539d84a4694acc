"""Method implementations: one file per method or family, each registering its config classes.

Every module here is imported by ``peftlab.core.registry`` on first use; adding a method is adding
a file.
"""
