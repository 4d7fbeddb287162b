"""Custom operators (torch.library, namespace `cs336`): one package per op, reference → kernels → registration."""
