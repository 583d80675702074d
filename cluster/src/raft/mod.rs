//! The control plane: the cluster map under openraft consensus.
