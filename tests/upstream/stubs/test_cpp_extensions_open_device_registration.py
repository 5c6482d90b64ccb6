"""Import stub: some releases' test_transformers.py import these two helpers at
module level for TestSDPAPrivateUse1Only (a fake PrivateUse1 device built as a
C++ extension), which suite.OUT_OF_SCOPE leaves out. A checkout that has the real
module uses it; this one only lets the file import without it."""


def remove_build_path():
    raise RuntimeError("stub: TestSDPAPrivateUse1Only is out of scope (tests/upstream/suite.py)")


def generate_faked_module():
    raise RuntimeError("stub: TestSDPAPrivateUse1Only is out of scope (tests/upstream/suite.py)")
