import pytest

pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")
