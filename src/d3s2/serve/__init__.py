"""``d3s2 serve``: the web app (image in, interactive 3D mesh out). The page is :mod:`d3s2.serve.app` (Gradio,
imported only when the command runs); the work behind it, testable without Gradio, is :mod:`d3s2.serve.backend`."""
