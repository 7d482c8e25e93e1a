/*
 * OHIF v3 (3.13.x) configuration for an existing OHIF pointed at the Orthanc where radfed writes its
 * results. Put it where your OHIF serves /app-config.js. OHIF must reach Orthanc's /dicom-web from the
 * same origin (Orthanc 1.10 sends no CORS headers): proxy /dicom-web to http://ORTHANC:8042/dicom-web in
 * the web server that serves OHIF, adding Orthanc's credentials there (never in this file).
 *
 * The keys radfed relies on (checked with OHIF 3.13.2 in radfed's viewer tests):
 *   disableConfirmationPrompts  radfed's SEG loads without the "load segmentation?" prompt
 *   measurementTrackingMode     'simplified': radfed's SR opens without the tracking prompt
 *   imageRendering 'wadors', qidoSupportsIncludeField false, omitQuotationForMultipartRequest true:
 *                               what Orthanc's DICOMweb plugin serves
 * Known OHIF 3.13.2 limits: an SR without any measurement (radfed's "no lesion found" report) blanks the
 * SR viewport; qualitative evaluations (category, probability text) are not displayed.
 */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  disableConfirmationPrompts: true,
  measurementTrackingMode: 'simplified',
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc with radfed results',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
