"""GPU target configs (`GpuTargetConfigProto` text) for compiling with XLA's GPU compiler: `jpipe.compile`."""
