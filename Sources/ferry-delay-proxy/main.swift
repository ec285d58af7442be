print("ferry-delay-proxy: not written yet")
