// MathJax 3, served from this site (docs/hooks.py copies it from django-static-mathjax).
// $...$ and $$...$$ as in Jupyter; \(...\) and \[...\] as pymdownx.arithmatex writes them.
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "ams",
  },
  options: {
    skipHtmlTags: ["script", "noscript", "style", "textarea", "pre", "code"],
    menuOptions: { settings: { assistiveMml: false } },
  },
  svg: { fontCache: "global" },
};
