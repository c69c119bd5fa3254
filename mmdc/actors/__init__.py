"""The Ray layer on top: the Driver actor, its phases as transactions, the engines it deploys and hands back, and
the cluster's resources and autoscaler requests."""
