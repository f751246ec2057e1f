"""megaqkv: 3D-parallel GPT pretraining with shared-projection attention variants."""
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    """Registers megaqkv's model with transformers' Auto classes once transformers is imported, in
    whichever order the two are imported. Registering imports transformers' model classes (about 4 s on
    CPU); processes that never import transformers (training, the CLIs) never pay it."""

    searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or self.searching:
            return None
        self.searching = True  # the other finders find it; a mere availability probe keeps this finder in place
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_then_register(module):
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                run(module)
                try:
                    from .hf import register

                    register()
                except Exception as exc:  # never break the user's `import transformers`
                    import warnings

                    warnings.warn(f"megaqkv could not register its model with transformers ({exc}); load its "
                                  "exports with trust_remote_code=True")

            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    from .hf import register as _register

    _register()
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())
