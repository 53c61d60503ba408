"""Every numba function of d2r, and nothing else.

Kernels take and return plain arrays and validate nothing: the public classes check their inputs once and call
them. Each kernel has a plain-numpy twin in the tests. Serial kernels are compiled with ``cache=True``; parallel
ones are not (caching ``parallel=True`` kernels breaks when the thread count changes).
"""
