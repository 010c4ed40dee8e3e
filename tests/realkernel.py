"""The test process's one kernel: integration tests are an entry of their own (as the CLI
is), so they make the RealKernel here and hand it to what they call."""

from netstack.kernel import RealKernel

KERNEL = RealKernel()
