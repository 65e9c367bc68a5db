"""KernelWarehouse layers and warehouse manager (``modules.kernel_warehouse``)."""
