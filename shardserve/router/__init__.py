"""Data parallelism's front: an HTTP router over engine replicas (`shardserve router`), and
`shardserve serve -dp N`, which runs N replica servers behind one."""
