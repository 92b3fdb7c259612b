"""The control plane: gRPC servicer, the transport-agnostic handler, its state, and the weight store."""
