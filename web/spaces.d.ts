// placeholder until web/ lands
