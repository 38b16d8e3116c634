"""Reports: tables and pictures of what alignment changed."""
