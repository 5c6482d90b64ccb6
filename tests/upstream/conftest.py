# stubs/ holds import stubs for PyTorch's test files, not tests of this project.
collect_ignore = ["stubs"]
