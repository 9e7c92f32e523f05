"""Events from backends to clients: upstream sockets (`upstream`), attribution and prompt bookkeeping
(`router`), and the client sockets they are delivered to (`hub`)."""
