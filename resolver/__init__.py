"""np-resolver: NetworkPolicy -> PolicyEndpoint, for clusters without the AWS controller."""
