"""np-cli (also installed as aws-eks-na-cli): inspect and query the node agent."""
