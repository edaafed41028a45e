"""Everything that touches Discord. It never imports torch: it talks to the workers
only through the database and the job queue."""
