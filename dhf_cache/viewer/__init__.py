"""`dhf-cache view`: a local web app over a cache, its checkpoints and evaluations (docs/viewer.md).

    data.py         ViewerData: everything the pages show, opened read-only from what it was given
    evals.py        an evaluation folder's pairs joined with its data set's records
    descriptors.py  descriptor choices (a checkpoint, a raw layer x timestep map) per cached image
    clicks.py       the similarity map of one clicked pixel, by the matching protocol of eval
    pictures.py     heatmaps, PCA images and photos encoded for the browser
    uploads.py      two photos of the user's matched on the fly (api.Hyperfeatures), as jobs
    memo.py         thread-safe bounded memory of computed values
    server.py       the tornado application: routes, request checks, errors as one line
    static/         the page: plain HTML, JS and CSS, no build step

The viewer imports the library; nothing in the library imports the viewer.
"""
