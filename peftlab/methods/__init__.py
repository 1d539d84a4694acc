"""Method implementations: one file per method or family, each registering its config classes.

Every module here is imported by ``peftlab.core.registry`` on first use; adding a method is adding
a file.

Importing this package binds ``peftlab.methods`` to it, which would shadow the public function
``peftlab.methods()``; the package is therefore callable and returns the registered names.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self) -> list[str]:
        from peftlab.core.registry import method_names

        return method_names()


sys.modules[__name__].__class__ = _CallablePackage
