"""Every numba function of d2r, and nothing else.

Kernels take and return plain arrays and validate nothing: the public classes check their inputs once and call
them. Each kernel has a plain-numpy twin in the tests. Every kernel, parallel ones included, is compiled with
``cache=True``, so a fresh process loads machine code instead of compiling (tests/test_query_path.py checks that a
second ``d2r search`` process, also with another thread count, compiles nothing).
"""
