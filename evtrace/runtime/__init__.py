"""Runtime modules the rewrite inserts: token gates and sparse regions, delta attention,
policies. Plain tensor math (torch only); imports nothing above ``evtrace.graph``."""
